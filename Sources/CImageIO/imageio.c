#define _GNU_SOURCE
#include "hrhf_imageio.h"

#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>
#include <limits.h>

void hrhf_free(void *p) { free(p); }

static int fail(char *err, size_t errlen, const char *msg) {
    snprintf(err, errlen, "%s", msg);
    return -1;
}

// ---- PNG ------------------------------------------------------------------------------------

typedef struct {
    jmp_buf jump;
    char message[256];
} png_failure;

static void png_error_fn(png_structp png, png_const_charp msg) {
    png_failure *f = (png_failure *)png_get_error_ptr(png);
    snprintf(f->message, sizeof f->message, "%s", msg);
    longjmp(f->jump, 1);
}

static void png_warning_fn(png_structp png, png_const_charp msg) { (void)png; (void)msg; }

// Ancillary chunks the decoder never uses: skipped unread, so text and profile bombs cost nothing.
static const png_byte ignored_chunks[] = {
    'i', 'C', 'C', 'P', '\0', 'i', 'T', 'X', 't', '\0', 's', 'P', 'L', 'T', '\0', 't', 'E', 'X', 't', '\0',
    'z', 'T', 'X', 't', '\0', 'e', 'X', 'I', 'f', '\0',
};

// The number of pixels, or -1 with a message when it is 0, overflows or exceeds the budget.
static int check_pixels(size_t width, size_t height, size_t max_pixels, size_t *pixels, char *err, size_t errlen) {
    if (width == 0 || height == 0) return fail(err, errlen, "the image has no pixels (width or height 0)");
    if (__builtin_mul_overflow(width, height, pixels) || *pixels > max_pixels) {
        snprintf(err, errlen, "%zux%zu pixels is over the limit of %zu pixels per image", width, height, max_pixels);
        return -1;
    }
    return 0;
}

// Reads from `fp` and closes it.
static int png_read_common(FILE *fp, hrhf_image *out, int index_mode, size_t max_pixels, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (!fp) return fail(err, errlen, "cannot open file");
    unsigned char sig[8];
    if (fread(sig, 1, 8, fp) != 8 || png_sig_cmp(sig, 0, 8)) {
        fclose(fp);
        return fail(err, errlen, "not a PNG file (bad signature)");
    }
    png_failure failure;
    failure.message[0] = 0;
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &failure, png_error_fn, png_warning_fn);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_read_struct(&png, &info, NULL);
        fclose(fp);
        return fail(err, errlen, "libpng could not start");
    }
    // Everything allocated after setjmp must be reachable from these volatile locals.
    unsigned char *volatile pixels = NULL;
    png_bytep *volatile rows = NULL;
    if (setjmp(failure.jump)) {
        free(pixels);
        free(rows);
        png_destroy_read_struct(&png, &info, NULL);
        fclose(fp);
        snprintf(err, errlen, "corrupt or truncated PNG: %s", failure.message);
        return -1;
    }
    png_init_io(png, fp);
    png_set_sig_bytes(png, 8);
    png_set_user_limits(png, 1 << 20, 1 << 20);
    png_set_chunk_cache_max(png, 128);
    png_set_chunk_malloc_max(png, 8 << 20);
    png_set_keep_unknown_chunks(png, PNG_HANDLE_CHUNK_NEVER, ignored_chunks, (int)(sizeof ignored_chunks / 5));
    png_read_info(png, info);
    png_uint_32 width = png_get_image_width(png, info), height = png_get_image_height(png, info);
    size_t pixel_count;
    if (check_pixels(width, height, max_pixels, &pixel_count, err, errlen) != 0) {
        png_destroy_read_struct(&png, &info, NULL);
        fclose(fp);
        return -1;
    }
    int color = png_get_color_type(png, info), depth = png_get_bit_depth(png, info);
    out->bit_depth = depth;
    out->has_palette = color == PNG_COLOR_TYPE_PALETTE;
    if (index_mode) {
        if (color != PNG_COLOR_TYPE_PALETTE && color != PNG_COLOR_TYPE_GRAY) {
            png_destroy_read_struct(&png, &info, NULL);
            fclose(fp);
            return fail(err, errlen, "a label mask must be a palette or greyscale PNG");
        }
        if (depth < 8) png_set_packing(png);
        if (depth == 16) png_set_swap(png);  // host (little-endian) order
    } else {
        if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
        if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
        if (png_get_valid(png, info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(png);
        if (depth == 16) png_set_strip_16(png);
        if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
        png_set_strip_alpha(png);
    }
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    size_t rowbytes = png_get_rowbytes(png, info);
    int bytes_per_sample = index_mode ? (depth == 16 ? 2 : 1) : 1;
    size_t expected = index_mode ? (size_t)width * bytes_per_sample : (size_t)width * 3;
    size_t pixel_bytes, row_pointer_bytes;
    if (rowbytes != expected || __builtin_mul_overflow(rowbytes, (size_t)height, &pixel_bytes)
        || __builtin_mul_overflow(sizeof(png_bytep), (size_t)height, &row_pointer_bytes)) {
        png_destroy_read_struct(&png, &info, NULL);
        fclose(fp);
        return fail(err, errlen, "unsupported PNG layout");
    }
    pixels = malloc(pixel_bytes);
    rows = malloc(row_pointer_bytes);
    if (!pixels || !rows) {
        free(pixels);
        free(rows);
        png_destroy_read_struct(&png, &info, NULL);
        fclose(fp);
        return fail(err, errlen, "out of memory");
    }
    for (png_uint_32 y = 0; y < height; y++) rows[y] = pixels + y * rowbytes;
    png_read_image(png, rows);
    png_read_end(png, NULL);
    png_destroy_read_struct(&png, &info, NULL);
    fclose(fp);
    free(rows);
    out->width = (int)width;
    out->height = (int)height;
    if (index_mode) {
        size_t value_bytes;
        int too_big = __builtin_mul_overflow(sizeof(uint16_t), pixel_count, &value_bytes);
        uint16_t *values = too_big ? NULL : malloc(value_bytes);
        if (!values) {
            free(pixels);
            return fail(err, errlen, "out of memory");
        }
        for (size_t i = 0; i < pixel_count; i++)
            values[i] = bytes_per_sample == 2 ? ((uint16_t *)pixels)[i] : pixels[i];
        free(pixels);
        out->pixels = values;
        out->channels = 1;
    } else {
        out->pixels = pixels;
        out->channels = 3;
    }
    return 0;
}

int hrhf_png_decode_rgb(const uint8_t *data, size_t length, size_t max_pixels, hrhf_image *out, char *err,
                        size_t errlen) {
    if (length == 0) return fail(err, errlen, "empty data");
    return png_read_common(fmemopen((void *)data, length, "rb"), out, 0, max_pixels, err, errlen);
}

int hrhf_png_decode_index(const uint8_t *data, size_t length, size_t max_pixels, hrhf_image *out, char *err,
                          size_t errlen) {
    if (length == 0) return fail(err, errlen, "empty data");
    return png_read_common(fmemopen((void *)data, length, "rb"), out, 1, max_pixels, err, errlen);
}

static int png_write_common(FILE *fp, int width, int height, int channels, const uint8_t *pixels,
                            const uint8_t *palette, char *err, size_t errlen);

int hrhf_png_encode(int width, int height, int channels, const uint8_t *pixels, const uint8_t *palette,
                    uint8_t **data, size_t *length, char *err, size_t errlen) {
    char *buffer = NULL;
    size_t size = 0;
    FILE *fp = open_memstream(&buffer, &size);
    int status = png_write_common(fp, width, height, channels, pixels, palette, err, errlen);
    if (status != 0) {
        free(buffer);
        return status;
    }
    *data = (uint8_t *)buffer;
    *length = size;
    return 0;
}

// Writes to `fp` and closes it.
static int png_write_common(FILE *fp, int width, int height, int channels, const uint8_t *pixels,
                            const uint8_t *palette, char *err, size_t errlen) {
    if (!fp) return fail(err, errlen, "cannot create file");
    if (width <= 0 || height <= 0) {
        fclose(fp);
        return fail(err, errlen, "empty image");
    }
    if (!(channels == 1 || channels == 3 || channels == 4) || (palette && channels != 1)) {
        fclose(fp);
        return fail(err, errlen, "unsupported channel count");
    }
    png_failure failure;
    failure.message[0] = 0;
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &failure, png_error_fn, png_warning_fn);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!png || !info) {
        png_destroy_write_struct(&png, &info);
        fclose(fp);
        return fail(err, errlen, "libpng could not start");
    }
    if (setjmp(failure.jump)) {
        png_destroy_write_struct(&png, &info);
        fclose(fp);
        snprintf(err, errlen, "cannot write PNG: %s", failure.message);
        return -1;
    }
    png_init_io(png, fp);
    int color = palette ? PNG_COLOR_TYPE_PALETTE
                        : channels == 1 ? PNG_COLOR_TYPE_GRAY : channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_RGBA;
    png_set_IHDR(png, info, (png_uint_32)width, (png_uint_32)height, 8, color, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (palette) {
        png_color colors[256];
        for (int i = 0; i < 256; i++) {
            colors[i].red = palette[3 * i];
            colors[i].green = palette[3 * i + 1];
            colors[i].blue = palette[3 * i + 2];
        }
        png_set_PLTE(png, info, colors, 256);
    }
    // No time chunk and fixed settings: the same pixels always give the same bytes.
    png_write_info(png, info);
    for (int y = 0; y < height; y++) png_write_row(png, (png_const_bytep)(pixels + (size_t)y * width * channels));
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    if (fclose(fp) != 0) return fail(err, errlen, "cannot finish writing the file");
    return 0;
}

// ---- JPEG -----------------------------------------------------------------------------------

typedef struct {
    struct jpeg_error_mgr base;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} jpeg_failure;

// Progressive files of more scans than this are refused: each scan passes over the whole image,
// so thousands of tiny scans would take minutes (photographs have about 10).
enum { jpeg_max_scans = 500 };

typedef struct {
    struct jpeg_progress_mgr base;
    jpeg_failure *failure;
} jpeg_scan_limit;

static void jpeg_progress_fn(j_common_ptr cinfo) {
    jpeg_scan_limit *limit = (jpeg_scan_limit *)cinfo->progress;
    j_decompress_ptr d = (j_decompress_ptr)cinfo;
    if (d->input_scan_number > jpeg_max_scans) {
        snprintf(limit->failure->message, sizeof limit->failure->message, "more than %d scans", jpeg_max_scans);
        longjmp(limit->failure->jump, 1);
    }
}

static void jpeg_error_exit_fn(j_common_ptr cinfo) {
    jpeg_failure *f = (jpeg_failure *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, f->message);
    longjmp(f->jump, 1);
}

// A warning means damaged data (libjpeg would fill the rest and go on): it stops decoding.
static void jpeg_emit_message_fn(j_common_ptr cinfo, int level) {
    jpeg_failure *f = (jpeg_failure *)cinfo->err;
    if (level >= 0) return;
    (*cinfo->err->format_message)(cinfo, f->message);
    longjmp(f->jump, 1);
}

int hrhf_jpeg_decode_rgb(const uint8_t *data, size_t length, size_t max_pixels, hrhf_image *out, char *err,
                         size_t errlen) {
    memset(out, 0, sizeof *out);
    if (length == 0) return fail(err, errlen, "empty data");
    FILE *fp = fmemopen((void *)data, length, "rb");
    if (!fp) return fail(err, errlen, "cannot open data");
    struct jpeg_decompress_struct cinfo;
    jpeg_failure failure;
    memset(&failure, 0, sizeof failure);
    cinfo.err = jpeg_std_error(&failure.base);
    failure.base.error_exit = jpeg_error_exit_fn;
    failure.base.emit_message = jpeg_emit_message_fn;
    unsigned char *volatile pixels = NULL;
    if (setjmp(failure.jump)) {
        free(pixels);
        jpeg_destroy_decompress(&cinfo);
        fclose(fp);
        snprintf(err, errlen, "corrupt or truncated JPEG: %s", failure.message);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_scan_limit scan_limit = {.base = {.progress_monitor = jpeg_progress_fn}, .failure = &failure};
    cinfo.progress = &scan_limit.base;
    // libjpeg's own buffers (a progressive file's coefficients: 2 bytes per pixel and component,
    // at most 4 full-size components) stay within 8 bytes per pixel of the budget plus 64 MiB.
    size_t memory_limit;
    if (__builtin_mul_overflow(max_pixels, (size_t)8, &memory_limit)
        || __builtin_add_overflow(memory_limit, (size_t)64 << 20, &memory_limit) || memory_limit > (size_t)LONG_MAX)
        memory_limit = (size_t)LONG_MAX;
    cinfo.mem->max_memory_to_use = (long)memory_limit;
    jpeg_stdio_src(&cinfo, fp);
    jpeg_read_header(&cinfo, TRUE);
    // Checked from the header, before jpeg_start_decompress allocates anything for the image.
    size_t pixel_count;
    if (check_pixels(cinfo.image_width, cinfo.image_height, max_pixels, &pixel_count, err, errlen) != 0) {
        jpeg_destroy_decompress(&cinfo);
        fclose(fp);
        return -1;
    }
    if (cinfo.num_components > 4) {
        snprintf(failure.message, sizeof failure.message, "%d colour components (at most 4)", cinfo.num_components);
        longjmp(failure.jump, 1);
    }
    cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);
    if (cinfo.output_components != 3 || cinfo.output_width != cinfo.image_width
        || cinfo.output_height != cinfo.image_height) {
        snprintf(failure.message, sizeof failure.message, "unsupported JPEG layout");
        longjmp(failure.jump, 1);
    }
    size_t stride = (size_t)cinfo.output_width * 3, pixel_bytes;
    if (__builtin_mul_overflow(pixel_count, (size_t)3, &pixel_bytes)) longjmp(failure.jump, 1);
    pixels = malloc(pixel_bytes);
    if (!pixels) {
        snprintf(failure.message, sizeof failure.message, "out of memory");
        longjmp(failure.jump, 1);
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = pixels + stride * cinfo.output_scanline;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_decompress(&cinfo);
    out->width = (int)cinfo.output_width;
    out->height = (int)cinfo.output_height;
    out->channels = 3;
    out->bit_depth = 8;
    jpeg_destroy_decompress(&cinfo);
    fclose(fp);
    out->pixels = pixels;
    return 0;
}
