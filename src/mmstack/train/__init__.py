"""mmstack.train"""
