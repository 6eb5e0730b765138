"""kvmarina.engine"""
