"""The study's Hydra configs (``scaling.conf``): YAML files only. This file makes the folder a
package so a wheel carries the configs and Hydra can find them as ``pkg://scaling.conf``."""
