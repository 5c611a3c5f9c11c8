"""imagegem_hf.dpo"""
