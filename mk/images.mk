# Images from the Dockerfiles (issue 9; docs/images.md), built here with Debian's buildah — no
# Docker daemon, no registry. Archives are cached in ${COMMANDNET_TOOLS_CACHE}/images, keyed by
# the Dockerfile and its build context: an unchanged tree builds nothing.

.PHONY: images images-list

# worker, operator, e2e-graphs (examples/custom-worker/Dockerfile), nats, postgres; FROM a Debian
# bookworm base made by mmdebstrap. `python -m e2e.testbed.images build --base registry` keeps
# the Dockerfiles' default base images instead (for machines that reach a registry).
images: $(STAMP)
	$(PY) -m e2e.testbed.images build

images-list: $(STAMP)
	$(PY) -m e2e.testbed.images list
