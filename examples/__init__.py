"""Example modules and the seed's "Production Environment" blueprint."""
