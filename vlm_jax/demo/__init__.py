"""The demo's own training stage: stage 0 (vision_pretrain.py) stands in for the pretrained vision tower every
real system imports, and stages.py runs it before the VLM stage (`train()` from its tower)."""
