"""Reading and writing: ISMRMRD/MRD, DICOM, mask files, the training data format, wire framing."""
