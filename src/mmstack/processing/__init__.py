"""mmstack.processing"""
