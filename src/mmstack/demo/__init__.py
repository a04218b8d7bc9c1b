"""The demo pipeline: stages with cached results and an HTML report."""
