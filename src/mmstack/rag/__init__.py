"""mmstack.rag"""
