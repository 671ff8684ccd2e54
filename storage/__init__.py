"""storage: the sparse-target record, the Zarr store, the wire codec and the input readers.

Imports nothing from ``teacher_service`` or ``student_trainer``: it is the common ground they
meet on (DESIGN §3).
"""
