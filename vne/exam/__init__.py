"""The exam: images with geometry and acquisition facts, their roles, and patient-coordinate geometry."""
