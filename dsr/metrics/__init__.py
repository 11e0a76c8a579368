"""Sample-quality metrics as the ADM evaluation suite computes them: Inception features (`inception`), FID, Inception
Score and precision / recall (`scores`), reference batches and their cached statistics (`reference`), and the whole
evaluation of a set of samples (`evaluation`)."""
