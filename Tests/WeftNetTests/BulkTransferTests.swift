#if canImport(Glibc)
import Glibc
#endif
import CWeftSupport
import NIOCore
import XCTest
import WeftProto
import WeftTestSupport
@testable import WeftNet

/// The bulk paths of SPEC.md §4 (Bulk transfers): the caching allocator, and frames built and
/// read without intermediate arrays, which must be byte for byte what the general codec makes.
final class BulkTransferTests: XCTestCase {
    private let allocator = BulkMemory.allocator
    private let context = RequestContext(session: 42, credentials: Credentials(uid: 7, gid: 8, groups: [9]))

    private func bytes(_ buffer: ByteBuffer) -> [UInt8] { Array(buffer.readableBytesView) }

    func testLargeBlocksArePageAlignedAndReusedSmallOnesAreNot() {
        let before = BulkMemory.statistics
        var large = allocator.buffer(capacity: 1 << 20)
        large.writeBytes([UInt8](repeating: 1, count: 1 << 20))
        large.withUnsafeReadableBytes { XCTAssertEqual(Int(bitPattern: $0.baseAddress!) % 4096, 0, "page-aligned") }
        large = allocator.buffer(capacity: 0)  // frees the block into the cache
        var again = allocator.buffer(capacity: 1 << 20)
        again.writeBytes([2])
        let after = BulkMemory.statistics
        XCTAssertGreaterThanOrEqual(after.reused, before.reused + 1, "the freed block served the next allocation")
        var small = allocator.buffer(capacity: 100)
        small.writeBytes([UInt8](repeating: 3, count: 100))
        XCTAssertEqual(bytes(small), [UInt8](repeating: 3, count: 100))
        _ = again
    }

    /// A block of 2 MiB or more starts on a 2 MiB boundary and is advised for huge pages, so a
    /// hub's O_DIRECT transfers from and into frames reach the disk in large requests; its
    /// header page in front is not advised.
    func testLargeBlocksAreMappedForHugePages() throws {
        let block = try XCTUnwrap(weft_bulk_allocate(4 << 20))
        defer { weft_bulk_free(block) }
        XCTAssertEqual(Int(bitPattern: block) % (2 << 20), 0, "a 2 MiB boundary")
        XCTAssertGreaterThanOrEqual(weft_bulk_capacity(block), 4 << 20)
        block.initializeMemory(as: UInt8.self, repeating: 7, count: 4 << 20)
        let flags = try XCTUnwrap(Mappings.flags(of: block))
        let header = try XCTUnwrap(Mappings.flags(of: block - 4096))
        if Mappings.kernelHasHugePages { XCTAssertTrue(flags.contains("hg"), "\(flags)") }
        XCTAssertFalse(header.contains("hg"), "\(header)")
        let small = try XCTUnwrap(weft_bulk_allocate(1 << 20))
        defer { weft_bulk_free(small) }
        XCTAssertEqual(Int(bitPattern: small) % 4096, 0)
        XCTAssertFalse(try XCTUnwrap(Mappings.flags(of: small)).contains("hg"), "under 2 MiB: small pages")
    }

    func testGrowingABufferKeepsItsBytes() {
        var buffer = allocator.buffer(capacity: 16)
        let pattern = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        for start in stride(from: 0, to: pattern.count, by: 1000) {
            buffer.writeBytes(pattern[start..<min(pattern.count, start + 1000)])
        }
        XCTAssertEqual(bytes(buffer), pattern, "small → large → larger reallocations copy the contents")
    }

    func testCacheStaysWithinItsLimit() {
        BulkMemory.setCacheLimit(bytes: 8 << 20)
        defer { BulkMemory.setCacheLimit(bytes: 64 << 20) }
        var buffers = (0..<6).map { _ in allocator.buffer(capacity: 3 << 20) }
        for index in buffers.indices { buffers[index].writeBytes([UInt8(index)]) }
        buffers.removeAll()
        XCTAssertLessThanOrEqual(BulkMemory.statistics.cachedBytes, 8 << 20)
        BulkMemory.setCacheLimit(bytes: 0)
        XCTAssertEqual(BulkMemory.statistics.cachedBytes, 0, "a lower limit releases at once")
    }

    func testWriteSliceFrameFromCallerMemoryEqualsTheGeneralEncoding() throws {
        for count in [0, 1, 65_536, (4 << 20) + 3] {
            let data = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
            let general = try WireCodec.requestBuffer(id: 99, .writeSlice(context, id: 1234, data: data), allocator: allocator)
            let direct = try data.withUnsafeBytes {
                try WireCodec.writeSliceRequestBuffer(id: 99, context: context, sliceID: 1234, bytes: $0, allocator: allocator)
            }
            XCTAssertEqual(bytes(direct), bytes(general), "\(count) bytes")
        }
        let tooLarge = [UInt8](repeating: 0, count: WireCodec.maxFrameBytes)
        XCTAssertThrowsError(try tooLarge.withUnsafeBytes {
            try WireCodec.writeSliceRequestBuffer(id: 1, context: context, sliceID: 1, bytes: $0, allocator: allocator)
        }) { XCTAssertEqual(($0 as? WeftError)?.errno, EMSGSIZE) }
    }

    func testBulkResponseEqualsTheGeneralEncodingAndPutsDataOnAPage() {
        for count in [0, 5, 65_536, 1 << 20] {
            let data = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 13) }
            let general = WireCodec.responseBuffer(id: 5, rawOpcode: HubOpcode.readSlice.rawValue, .success(.bytes(data)),
                                                   allocator: allocator)
            var alignedFill = true
            let direct = WireCodec.bulkResponseBuffer(id: 5, rawOpcode: HubOpcode.readSlice.rawValue, count: count,
                                                      allocator: allocator) { target in
                alignedFill = Int(bitPattern: target.baseAddress) % 4096 == 0
                data.withUnsafeBytes { target.copyMemory(from: $0) }
            }
            XCTAssertEqual(bytes(direct), bytes(general), "\(count) bytes")
            if count >= 65_536 { XCTAssertTrue(alignedFill, "a store can read \(count) bytes into it with O_DIRECT") }
        }
    }

    func testBulkResponseOfAFailedReadIsTheError() {
        let failure = WeftError(ENOENT, "chunk gone")
        let direct = WireCodec.bulkResponseBuffer(id: 6, rawOpcode: HubOpcode.readSliceFrom.rawValue, count: 1 << 20,
                                                  allocator: allocator) { _ in throw failure }
        let general = WireCodec.responseBuffer(id: 6, rawOpcode: HubOpcode.readSliceFrom.rawValue, .failure(failure),
                                               allocator: allocator)
        XCTAssertEqual(bytes(direct), bytes(general))
    }

    func testHubTakesWriteSliceDataOutOfTheReceiveBufferOntoAPage() throws {
        func frame(_ count: Int) throws -> InboundFrame {
            let data = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 3) }
            var buffer = try WireCodec.requestBuffer(id: 7, .writeSlice(context, id: 55, data: data), allocator: allocator)
            buffer.moveReaderIndex(forwardBy: 1)  // not where the allocator's block starts
            buffer.moveReaderIndex(forwardBy: WireCodec.lengthPrefixBytes + WireCodec.headerBytes - 1)
            return InboundFrame(header: FrameHeader(kind: .request, opcode: HubOpcode.writeSlice.rawValue, requestID: 7),
                                payload: buffer)
        }
        let large = try frame(1 << 20)
        let detached = HubConnection.detachingBulk(large)
        XCTAssertEqual(bytes(detached.payload), bytes(large.payload), "the same payload")
        try detached.payload.withUnsafeReadableBytes { raw in
            var reader = ByteReader(raw)
            _ = try RequestContext.decode(from: &reader)
            let (id, data) = try HubRequest.decodeWriteSliceTail(from: &reader)
            XCTAssertEqual(id, 55)
            XCTAssertEqual(Int(bitPattern: data.baseAddress) % 4096, 0, "the data starts on a page")
        }
        let small = try frame(100)
        small.payload.withUnsafeReadableBytes { before in
            HubConnection.detachingBulk(small).payload.withUnsafeReadableBytes {
                XCTAssertEqual($0.baseAddress, before.baseAddress, "a small frame is left where it is")
            }
        }
        var truncated = large
        truncated.payload.moveWriterIndex(to: truncated.payload.writerIndex - 1)
        truncated.payload.withUnsafeReadableBytes { before in
            HubConnection.detachingBulk(truncated).payload.withUnsafeReadableBytes {
                XCTAssertEqual($0.baseAddress, before.baseAddress, "a malformed frame is left for the worker to refuse")
            }
        }
    }

    func testBulkResponseDecodesIntoCallerMemory() throws {
        func payload(_ result: Result<HubResponse, WeftError>) -> ByteBuffer {
            var frame = WireCodec.responseBuffer(id: 1, rawOpcode: HubOpcode.readSlice.rawValue, result, allocator: allocator)
            frame.moveReaderIndex(forwardBy: WireCodec.lengthPrefixBytes + WireCodec.headerBytes)
            return frame
        }
        var destination = [UInt8](repeating: 0, count: 4)
        try destination.withUnsafeMutableBytes {
            try WireCodec.decodeBulkResponse(opcode: .readSlice, payload: payload(.success(.bytes([1, 2, 3, 4]))), into: $0).get()
        }
        XCTAssertEqual(destination, [1, 2, 3, 4])
        let short = try destination.withUnsafeMutableBytes {
            try WireCodec.decodeBulkResponse(opcode: .readSlice, payload: payload(.success(.bytes([9]))), into: $0)
        }
        XCTAssertThrowsError(try short.get()) { XCTAssertEqual(($0 as? WeftError)?.errno, EIO, "a wrong length is EIO") }
        let failed = try destination.withUnsafeMutableBytes {
            try WireCodec.decodeBulkResponse(opcode: .readSlice, payload: payload(.failure(WeftError(EINVAL, "range"))), into: $0)
        }
        XCTAssertThrowsError(try failed.get()) {
            XCTAssertEqual(($0 as? WeftError)?.errno, EINVAL)
            XCTAssertEqual(($0 as? WeftError)?.message, "range")
        }
        var truncated = payload(.success(.bytes([1, 2, 3, 4])))
        truncated.moveWriterIndex(to: truncated.writerIndex - 1)
        XCTAssertThrowsError(try destination.withUnsafeMutableBytes {
            try WireCodec.decodeBulkResponse(opcode: .readSlice, payload: truncated, into: $0)
        }, "a truncated payload is malformed")
        XCTAssertEqual(destination, [1, 2, 3, 4], "nothing written on failure")
    }
}
