"""Whole-slide stages: reading slides (wsi), annotations, the slide table (cohort), its raw-file
listings (sources) and per-slide tiling into the patch store (tiling)."""
