"""Evaluation: FID, CLIP score and the guidance sweep."""
