"""Model families: two-tower (CLIP/SigLIP), bridge (LLaVA-style), native (VQ + decoder), reward.

Models return features or logits; losses live in ``losses.py``; training lives in ``mmstack.train``.
"""
