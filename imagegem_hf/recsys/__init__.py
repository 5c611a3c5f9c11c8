"""imagegem_hf.recsys"""
