//! DPO-family and ReprPO-family losses as pure tensor functions (issue 4: not yet written).
