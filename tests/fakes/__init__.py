"""Fakes of paid external APIs, for tests only: real servers on loopback that speak the real wire protocols."""
