# megatron_ualm on NGC PyTorch (CUDA, cuDNN, NCCL, Transformer Engine, apex, DALI preinstalled).
#   docker build -t megatron-ualm .
#   docker run --gpus all --ipc=host --rm megatron-ualm torchrun --nproc-per-node 8 -m megatron_ualm.pretrain ...
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}

WORKDIR /workspace/megatron_ualm
COPY pyproject.toml setup.py README.md ./
COPY megatron_ualm ./megatron_ualm
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks

# Keep the image's torch and Transformer Engine: pin them to what is installed, then install
# this package with megatron-core 0.19.x and the audio / tokenizer dependencies.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && python -m pip install --no-cache-dir --constraint /tmp/constraints.txt -e . \
 && python -c "import megatron.core, transformer_engine, megatron_ualm; print('megatron-core', megatron.core.__version__)"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1
WORKDIR /workspace
