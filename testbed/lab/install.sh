# Lay out the lab host's software: a cuda module for Lmod and a conda stand-in.
set -e
# Lmod: a module that changes PATH and sets an env var, as real ones do.
mkdir -p /opt/modulefiles/cuda /opt/cuda-12.2/bin
cp /opt/lab/cuda-12.2.lua /opt/modulefiles/cuda/12.2.lua
printf '#!/bin/sh\necho "nvcc stand-in: Cuda compilation tools, release 12.2"\n' > /opt/cuda-12.2/bin/nvcc
chmod 755 /opt/cuda-12.2/bin/nvcc
echo /opt/modulefiles >> /etc/lmod/modulespath
# conda: the parts fabfleet uses, faithful to conda's interface.
mkdir -p /opt/conda/bin /opt/conda/etc/profile.d /opt/conda/envs/lab/bin
cp /opt/lab/conda /opt/conda/bin/conda
cp /opt/lab/conda.sh /opt/conda/etc/profile.d/conda.sh
chmod 755 /opt/conda/bin/conda
ln -s /usr/bin/python3 /opt/conda/envs/lab/bin/python3
ln -s /usr/bin/python3 /opt/conda/envs/lab/bin/python
# micromamba: the shell hook and activation, faithful to micromamba's interface.
mkdir -p /opt/micromamba/bin /opt/micromamba/envs/mm/bin
cp /opt/lab/micromamba /opt/micromamba/bin/micromamba
chmod 755 /opt/micromamba/bin/micromamba
ln -s /usr/bin/python3 /opt/micromamba/envs/mm/bin/python3
