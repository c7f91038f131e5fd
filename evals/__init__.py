"""Reconstruction evaluation: rFID/KID (standard FID Inception), PSNR/SSIM/LPIPS, video metrics, reports."""
