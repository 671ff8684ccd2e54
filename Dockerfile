# aligndistil in a container: `docker build -t aligndistil .`, then `docker run aligndistil --help`.
# docker-compose.yml builds it for you (README, "Docker").
#
# BASE_IMAGE: any image with Python >= 3.11 as python3 and its venv module (default the official
# python:3.11-slim; tests/test_docker.py builds on a Debian image made without a registry).
#
# torch is pinned to 2.13.0 (pyproject.toml). Which build you get:
#   a torch-2.13.0*.whl in docker/wheels/ (an ignored folder)  that wheel, installed first: no
#       download at all (e.g. the CPU wheel a CPU machine already has);
#   --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index>   the CPU build (2.13.0+cpu), installed
#       first, so the aligndistil install finds the pin satisfied: a CPU image a few GB smaller;
#   TORCH_INDEX_URL unset                                     torch 2.13.0 from pip's default index,
#       which on Linux x86_64 is the CUDA build: the GPU image (it runs on a CPU too);
#   --build-arg TORCH_INDEX_URL=<a CUDA wheel index>          a particular CUDA build.
# The same approach as scripts/setup_env.sh.
#
# Layers: what changes least comes first (the user, the venv, the image's settings, torch, the
# dependencies), the sources last, so a change to the sources rebuilds only the last few.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=
ARG UID=1000

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/aligndistil \
    PATH=/opt/aligndistil/bin:$PATH

# Run as a user, not root. /data belongs to it before VOLUME, so a fresh named volume mounted
# there is writable (Docker copies the ownership into it).
RUN useradd --create-home --uid "$UID" aligndistil \
    && mkdir /data && chown aligndistil:aligndistil /data \
    && python3 -m venv /opt/aligndistil
VOLUME /data
# The teacher server's port (`aligndistil serve --host 0.0.0.0 --port 8000` in a container).
EXPOSE 8000
ENTRYPOINT ["aligndistil"]
CMD ["--help"]

# torch first, in its own layers: the largest download, and it changes least.
COPY docker/wheels/ /tmp/wheels/
RUN if ls /tmp/wheels/torch-2.13.0*.whl > /dev/null 2>&1; then \
        pip install /tmp/wheels/torch-2.13.0*.whl; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"; \
    fi \
    && rm -rf /tmp/wheels

# The dependencies next, in their own layer: rebuilt only when pyproject.toml changes.
WORKDIR /opt/aligndistil-src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))\
['project']['dependencies'], sep=chr(10))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY aligndistil ./aligndistil
COPY storage ./storage
COPY causal_lm ./causal_lm
COPY teacher_service ./teacher_service
COPY student_trainer ./student_trainer
RUN pip install --no-deps . \
    && python -c "import torch; print('torch', torch.__version__)" \
    && aligndistil --help > /dev/null

USER aligndistil
WORKDIR /data
