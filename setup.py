"""Runtime dependencies, with the ONNX Runtime build chosen at install time.

``pip install -e .``                 -> onnxruntime (CPU)
``VNE_ORT=gpu pip install -e .``     -> onnxruntime-gpu (CUDA hosts, the GPU container)

Both wheels install the same ``onnxruntime`` module and must never be installed together,
so this is a build-time choice rather than two extras that could both be selected.
"""
import os

from setuptools import setup

ORT = "onnxruntime-gpu>=1.17" if os.environ.get("VNE_ORT", "cpu").lower() == "gpu" else "onnxruntime>=1.17"

setup(
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "ismrmrd>=1.14,<2",
        "gadgetron>=1.4",
        "pydicom>=3.0.1",  # the floor of highdicom; vne.io.dicom_seg uses pydicom.pixels
        "h5py>=3.8",
        "nibabel>=5",  # NIfTI evaluation masks (vne evaluate --masks, vne.io.nifti)
        "highdicom>=0.28",  # DICOM-SEG evaluation masks (vne evaluate --masks, vne.io.dicom_seg); no torch
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "threadpoolctl>=3.1",  # numpy's BLAS on one thread beside ONNX Runtime (vne.runtime.model)
        ORT,
    ]
)
