"""Model definitions (Image GPT; DALL·E, dVAE and CLIP later)."""
