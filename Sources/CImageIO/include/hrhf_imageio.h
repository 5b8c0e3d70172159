#ifndef HRHF_IMAGEIO_H
#define HRHF_IMAGEIO_H
#include <stddef.h>
#include <stdint.h>

// Image decoding and encoding through libpng and libjpeg with their longjmp/exit error paths
// contained here: every function returns 0 on success, or -1 with a message in `err`.

typedef struct {
    int width, height, channels;  // channels: 3 (RGB) or 1 (indices / grey values)
    int bit_depth;                // of the source file
    int has_palette;
    void *pixels;                 // RGB: uint8 x 3; index mode: uint16 per pixel. Free with hrhf_free.
} hrhf_image;

// Decoders refuse an image of more than `max_pixels` pixels (width x height, read from the
// header) before allocating anything for its pixels.

// Any PNG (grey, grey+alpha, RGB, RGBA, palette; 1-16 bit; interlaced) as 8-bit RGB.
int hrhf_png_decode_rgb(const uint8_t *data, size_t length, size_t max_pixels, hrhf_image *out, char *err,
                        size_t errlen);
// A single-channel PNG's raw sample values (palette indices, or grey values up to 16 bit).
int hrhf_png_decode_index(const uint8_t *data, size_t length, size_t max_pixels, hrhf_image *out, char *err,
                          size_t errlen);
// PNG bytes (free *data with hrhf_free): 8-bit grey (channels 1), RGB (3) or RGBA (4) or, with
// `palette` (256 RGB triples), an 8-bit palette PNG of the index values in `pixels`.
int hrhf_png_encode(int width, int height, int channels, const uint8_t *pixels, const uint8_t *palette,
                    uint8_t **data, size_t *length, char *err, size_t errlen);
// Baseline, progressive or greyscale JPEG as 8-bit RGB. Truncated data is an error.
int hrhf_jpeg_decode_rgb(const uint8_t *data, size_t length, size_t max_pixels, hrhf_image *out, char *err,
                         size_t errlen);
void hrhf_free(void *p);

#endif
