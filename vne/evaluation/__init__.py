"""VNE against LGE: lesion quantification, statistics, the report, collection of DICOM exams."""
