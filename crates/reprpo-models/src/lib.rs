//! Llama and Phi-3 on candle with full-sequence logits, hidden states and adapters (issue 3: not yet written).
