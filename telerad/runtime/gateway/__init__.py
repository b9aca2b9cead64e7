"""A site gateway: the DICOM receiver, its HTTP port, and the loops that move studies on."""
