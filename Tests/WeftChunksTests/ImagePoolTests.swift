@testable import WeftChunks
import XCTest

/// The free list of compressed objects' images (SPEC.md §3.1, Compression rule).
final class ImagePoolTests: XCTestCase {
    func testTakesArePageAlignedWholePagesAndReuseWhatWasGivenBack() {
        let pool = ImagePool()
        let first = pool.take(byteCount: 5000)
        XCTAssertEqual(first.count, 8192)
        XCTAssertEqual(Int(bitPattern: first.baseAddress) % 4096, 0)
        pool.give(first)
        let again = pool.take(byteCount: 100)
        XCTAssertEqual(again.baseAddress, first.baseAddress, "a buffer that fits is reused")
        pool.give(again)
        XCTAssertEqual(pool.idleSizes, [8192])
    }

    func testATakeGetsTheSmallestIdleBufferThatFits() {
        let pool = ImagePool()
        let sizes = [64 << 10, 4 << 20, 8 << 10, 1 << 20]
        let buffers = sizes.map { pool.take(byteCount: $0) }
        buffers.forEach(pool.give)
        XCTAssertEqual(pool.take(byteCount: 10_000).count, 64 << 10)
        XCTAssertEqual(pool.take(byteCount: 2 << 20).count, 4 << 20)
        XCTAssertEqual(pool.idleSizes, [8 << 10, 1 << 20])
    }

    /// Small objects' images given back to a full list do not crowd out chunk-sized ones: a
    /// larger buffer replaces the smallest idle one, a smaller one is freed.
    func testAFullListKeepsTheLargestBuffers() {
        let pool = ImagePool()
        let small = (0..<ImagePool.maxIdle).map { _ in pool.take(byteCount: 8192) }
        let large = pool.take(byteCount: 4 << 20)
        small.forEach(pool.give)
        pool.give(large)
        XCTAssertEqual(pool.idleSizes, [8192, 8192, 8192, 4 << 20])
        let again = pool.take(byteCount: 4 << 20)
        XCTAssertEqual(again.baseAddress, large.baseAddress, "the large buffer was kept")
        pool.give(again)
        let smaller = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        pool.give(smaller)   // smaller than every idle one: freed
        XCTAssertEqual(pool.idleSizes, [8192, 8192, 8192, 4 << 20])
    }

    func testBuffersOverTheLimitAreNotKept() {
        let pool = ImagePool()
        pool.give(pool.take(byteCount: ImagePool.maxPooledBytes + 1))
        XCTAssertEqual(pool.idleSizes, [])
        pool.give(pool.take(byteCount: ImagePool.maxPooledBytes))
        XCTAssertEqual(pool.idleSizes, [ImagePool.maxPooledBytes])
    }
}
