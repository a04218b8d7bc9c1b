"""mmstack.index"""
