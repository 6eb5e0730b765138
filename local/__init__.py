"""kvmarina.local"""
