"""Ingestion (DICOM, NIfTI, MSD), geometry, dataset fingerprint -> plan, MONAI transform chains.

Imports nothing else of ours.
"""
