"""kvmarina.agent"""
