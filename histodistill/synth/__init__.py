"""The two synthetic demos: a Camelyon16-shaped WSI cohort (:mod:`.cohort`) and a pre-tiled
patch set (:mod:`.patches`), rendered from shared primitives (:mod:`.tissue`)."""
