"""Pi0.5 as plain functions over parameter pytrees: SigLIP, the Gemma towers, pi05's joint pass,
subtask decoding, real-time chunking's guidance, and the training objective."""
