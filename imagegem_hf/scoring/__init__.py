"""imagegem_hf.scoring"""
