"""Wire types only: msgspec Structs mirroring the OpenAI API's names."""
