"""Selection of images from a pool (a synthetic store, or the real patches): InfoDist's Infomap
communities (:mod:`.infodist`, its boundary loss in :mod:`.boundary`), HistoDiffusion's
confident-and-central samples (:mod:`.centroid`) and seeded random selection, registered by name
(:data:`.base.SELECTORS`), the rule that writes a selected set in the distilled-set format
(:mod:`.run`, which registers every selector) and HistoDiffusion's augmentation study
(:mod:`.study`). Rule file ``workflow/rules/select.smk``.

Nothing is imported here: the evaluator imports :mod:`.boundary` alone, and a rule's code hash
covers the package's ``__init__``.
"""
