"""kvmarina.router"""
