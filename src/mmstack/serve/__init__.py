"""mmstack.serve"""
