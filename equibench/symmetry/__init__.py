"""symmetry"""
