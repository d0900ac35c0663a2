"""Prompts: A1111's prompt syntax and weighting (:mod:`.syntax`, :mod:`.weighting`) and LoRA merging (:mod:`.lora`)."""
