"""mmstack.eval"""
