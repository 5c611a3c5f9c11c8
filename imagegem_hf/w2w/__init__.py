"""imagegem_hf.w2w"""
