-- A cuda module as HPC sites write them: PATH and an env var.
whatis("CUDA 12.2 (fabfleet testbed stand-in)")
prepend_path("PATH", "/opt/cuda-12.2/bin")
setenv("CUDA_HOME", "/opt/cuda-12.2")
