"""mmstack.data"""
