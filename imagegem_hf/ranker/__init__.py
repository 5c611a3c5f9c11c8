"""imagegem_hf.ranker"""
