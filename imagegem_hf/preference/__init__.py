"""imagegem_hf.preference"""
