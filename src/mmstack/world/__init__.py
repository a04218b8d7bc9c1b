"""mmstack.world"""
