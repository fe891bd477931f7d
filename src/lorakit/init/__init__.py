"""Data-driven initialisers: calibration hooks and the factor maths they feed."""
