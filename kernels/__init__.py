"""kvmarina.kernels"""
