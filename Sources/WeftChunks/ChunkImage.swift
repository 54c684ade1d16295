#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import WeftProto

/// The stored image of a compressed object: the bytes of its whole file (SPEC.md §3.2, format
/// version 2), built where the object is written, by a store or by an agent that uploads it
/// compressed (SPEC.md §4, Compressed uploads).
public enum ChunkImage {
    /// Scratch memory of agents' encodes; a store uses its own pool.
    static let workspaces = WorkspacePool()

    /// Calls `body` with the image of object `id` holding `data` compressed, or with nil when
    /// no block shrank (or `data` is empty): the object is then stored uncompressed, from
    /// `data`. The image lives in pooled, page-aligned memory only during `body`.
    public static func withCompressed<T>(id: SliceID, data: UnsafeRawBufferPointer,
                                         _ body: (UnsafeRawBufferPointer?) throws -> T) rethrows -> T {
        guard let encoded = Encoded.compress(id: id, data: data, workspaces: workspaces, images: .shared) else {
            return try body(nil)
        }
        defer { ImagePool.shared.give(encoded.buffer) }
        return try body(encoded.bytes)
    }

    /// A compressed object's image in a buffer of `ImagePool`, which the caller gives back.
    struct Encoded {
        let buffer: UnsafeMutableRawBufferPointer
        let layout: ChunkLayout

        var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: buffer[0..<layout.fileBytes]) }

        /// Compresses each block of `data` as one zstd frame into a page-aligned image: the
        /// header first (its length is known from the block count), then every payload in order,
        /// a block that does not shrink copied raw. Nil, with the buffer back in `images`, when
        /// no block shrank.
        static func compress(id: SliceID, data: UnsafeRawBufferPointer, workspaces: WorkspacePool,
                             images: ImagePool) -> Encoded? {
            precondition(data.count <= ChunkFormat.maxRawBytes, "object over the size limit")
            let blockSize = ChunkFormat.blockSizeBytes
            let blockCount = ChunkFormat.blockCount(rawLength: data.count)
            guard blockCount > 0 else { return nil }
            let headerLength = ChunkFormat.headerBytes(blockCount: blockCount)
            let output = images.take(byteCount: headerLength + data.count)
            var blocks = ContiguousArray<BlockEntry>()
            blocks.reserveCapacity(blockCount)
            var fileOffset = headerLength
            workspaces.with { workspace in
                for index in 0..<blockCount {
                    let start = index * blockSize
                    let raw = UnsafeRawBufferPointer(rebasing: data[start..<min(start + blockSize, data.count)])
                    let checksum = crc32c(raw)
                    // Room for one byte less than raw: zstd fails unless the block shrinks.
                    let room = UnsafeMutableRawBufferPointer(rebasing: output[fileOffset..<fileOffset + raw.count - 1])
                    if raw.count > 1, let size = workspace.compress(raw, into: room) {
                        blocks.append(BlockEntry(fileOffset: fileOffset, storedLength: size, crc: checksum, compressed: true))
                        fileOffset += size
                    } else {
                        UnsafeMutableRawBufferPointer(rebasing: output[fileOffset..<fileOffset + raw.count])
                            .copyMemory(from: raw)
                        blocks.append(BlockEntry(fileOffset: fileOffset, storedLength: raw.count, crc: checksum,
                                                 compressed: false))
                        fileOffset += raw.count
                    }
                }
            }
            guard blocks.contains(where: { $0.compressed }) else {
                images.give(output)
                return nil
            }
            // The data starts right after the header (D = H).
            blocks.withUnsafeBufferPointer {
                ChunkFormat.encodeHeader(into: UnsafeMutableRawBufferPointer(rebasing: output[0..<headerLength]), id: id,
                                         compression: .zstd, rawLength: data.count, dataOffset: headerLength,
                                         blocks: $0)
            }
            return Encoded(buffer: output, layout: ChunkLayout(rawLength: data.count, dataOffset: headerLength,
                                                               blocks: blocks, fileBytes: fileOffset))
        }
    }

    /// Checks an image received for object `id` as thoroughly as a read would: the header and
    /// block table (`decodeHeader`, which also requires the file length the table describes),
    /// what the encoder builds (format version 2 or later, zstd, no padding after the header, at
    /// least one compressed block), and every block: a compressed one must
    /// decompress to exactly its raw length, and each block's raw bytes must match its CRC32C.
    /// Returns the layout; throws EBADMSG naming the first failure.
    static func verify(id: SliceID, image: UnsafeRawBufferPointer, workspaces: WorkspacePool) throws -> ChunkLayout {
        func refused(_ reason: String) -> WeftError {
            WeftError(EBADMSG, "object image for chunk \(hex(id)) refused: \(reason)")
        }
        let layout: ChunkLayout
        do {
            layout = try ChunkFormat.decodeHeader(image, fileBytes: image.count, expectedID: id)
        } catch {
            throw refused("\(error.block): \(error.reason)")
        }
        // What the encoder builds: version 2 or later (decodeHeader refused any this build does
        // not read), zstd, payloads right after the header, and something compressed.
        let version = image.load(fromByteOffset: 4, as: UInt8.self)
        guard version >= 2 else { throw refused("format version \(version); images are version 2 or later") }
        guard image.load(fromByteOffset: 5, as: UInt8.self) == Compression.zstd.rawValue else {
            throw refused("compression byte \(image.load(fromByteOffset: 5, as: UInt8.self)) is not zstd")
        }
        guard layout.dataOffset == ChunkFormat.headerBytes(blockCount: layout.blocks.count) else {
            throw refused("payloads start at \(layout.dataOffset), not right after the header")
        }
        guard layout.blocks.contains(where: { $0.compressed }) else { throw refused("no compressed block") }
        if let (block, reason) = workspaces.with({ layout.firstDamagedBlock(in: image, workspace: $0) }) {
            throw refused("block \(block) \(reason)")
        }
        return layout
    }
}
